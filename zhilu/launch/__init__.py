"""Launching a job: :mod:`zhilu.launch.prepare` checks it against this machine before anything
starts and runs it; :mod:`zhilu.launch.local` starts local processes under torch elastic."""
