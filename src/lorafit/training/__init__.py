"""Training one run: the recipe (setup, loop, save), its checkpoints, and training over several processes."""
