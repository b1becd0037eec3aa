"""The bodies of bpnet's commands (inference, evaluate, import_model, ...).

Each module here is one command: it takes the command's options as
arguments, drives the reusable library packages (``bpnet.infer``,
``bpnet.data``, ``bpnet.model``) and writes the command's outputs. The
command line (``bpnet.cli``) calls these functions and adds only option
parsing, logging, status.json and error reporting; they can be called from
Python the same way. Training, the largest, is a package of its own
(``bpnet.train``) and dataset conversion lives with the data code
(``bpnet.data.convert``).
"""
