from freqmedclip.data.phantoms.generate import main

main()
