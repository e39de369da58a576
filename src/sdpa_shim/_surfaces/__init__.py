"""The user surfaces: the CLI, doctor, demo and start-up activation. Nothing below imports them."""
