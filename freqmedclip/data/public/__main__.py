"""``python -m freqmedclip.data.public``: see :mod:`freqmedclip.data.public.convert`."""

import sys

from freqmedclip.data.public.convert import main

sys.exit(main(sys.argv[1:]))
