"""The compiler: front end, Graph, pass manager and verification; imports no back end."""
