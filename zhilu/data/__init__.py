"""Training data: corpus sources (:mod:`.corpus`) and the sharded, resumable loader (:mod:`.loader`)."""
