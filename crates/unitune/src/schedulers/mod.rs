//! Sampling schedulers (in progress)
