"""Reading and writing: model loading (safetensors only), data files, run directories, input validation,
device placement, the locations of the built-in models and tasks. Imports nothing else of transfertune."""
