"""Where examples come from and what they mean: the embedded corpus, files, datasets, benchmarks, Task/Split and task metrics."""
