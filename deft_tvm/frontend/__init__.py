"""The torch front end: argument checks, the custom ops (autograd, autocast, fake kernels), the
functional API, the modules and the ONNX export. Imports the runtime and the compute layer."""
