"""Data: scanning image folders, splitting, the torch dataset and the demo writers."""
