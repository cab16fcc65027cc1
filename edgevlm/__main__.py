from edgevlm.cli import main

main()
