"""The compiler: front end, Graph, pass manager, pipelines and verification (no back-end imports)."""
