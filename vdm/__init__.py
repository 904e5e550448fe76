"""The `vdm` command (cli.py) and the local stack it starts (stack.py): the front door to
the platform's steps, pipelines and servers on one machine."""
