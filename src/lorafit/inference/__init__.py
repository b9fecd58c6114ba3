"""Using a trained run: load it (adapter and head on its base), predict, evaluate, export a merged model."""
