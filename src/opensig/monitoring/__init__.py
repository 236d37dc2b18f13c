"""Production monitoring: the prediction log and the drift report over it."""
