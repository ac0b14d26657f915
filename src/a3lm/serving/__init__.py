"""An OpenAI-compatible server for A3 models (`a3lm serve`, in app.py), its batching worker (engine.py), and
the page that shows the fill order (page/)."""
