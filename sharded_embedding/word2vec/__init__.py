"""Skip-gram word vectors on sharded tables: the training app behind `python -m sharded_embedding.train`."""
