"""The SPM file format and the model families: reading/writing safetensors strictly, metadata, key names, architectures, checkpoints."""
