"""The work behind each command. Nothing here imports typer or rich; long work reports through a
``progress(event, **info)`` callback."""
