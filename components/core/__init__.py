"""Libraries the pipeline steps and tools share: artifact contract, data format, model, metrics, serving."""
