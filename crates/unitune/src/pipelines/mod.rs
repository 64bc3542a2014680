//! Pipelines (in progress)
