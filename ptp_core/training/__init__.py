"""Training the prompt: PTP regularizers and their noise, text perturbations, evaluation of a split, the loop, reporting."""
