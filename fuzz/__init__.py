"""Coverage-guided fuzzing (atheris) of every parser that reads bytes from the network."""
