from firm_lightning.cli import main

main()
