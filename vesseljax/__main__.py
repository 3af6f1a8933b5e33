"""`python -m vesseljax` is `python -m vesseljax.launch`."""
from vesseljax.launch import run

run()
