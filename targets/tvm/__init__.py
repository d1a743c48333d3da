"""TVM target: import the passed ExportedProgram into Relax, lower llmc ops to kernels of our
own (packed-weight matmuls, attention on a shared KV buffer written in place), build for the host
CPU, and run the module on TVM's Relax virtual machine with the weights beside the library."""
