"""Operations: the ``lmcache-s3layer`` CLI, ``plan`` (will it hide, what will it cost),
``inspect`` and ``gc``."""
