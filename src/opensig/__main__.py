"""`python -m opensig` (what `torchrun -m opensig train` runs in every process)."""

from opensig.cli import app

app(prog_name="opensig")
