//! Training: optimizers and the tune loop (in progress)
