from cellmorph.cli import main

main()
