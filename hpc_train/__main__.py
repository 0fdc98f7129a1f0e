from hpc_train.cli import entry

entry()
