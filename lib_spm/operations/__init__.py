"""Working on SPM files: merging and packs, the SPM folder (library), temporary files, the WebUI Lora compatibility check."""
