import sys

if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):  # the command list: nothing else imported
    from firm_lightning.commands import usage

    print(usage())
else:
    from firm_lightning.cli import main

    main()
