"""`llmc serve`: an OpenAI-compatible server over one artifact (app.py), its request and
response shapes (protocol.py), metrics (metrics.py), the uvicorn runner (run.py) and the Ray
Serve deployment (ray_serve.py). Its dependencies are the `serve` extra."""
