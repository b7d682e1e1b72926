from trainkit.cli import main

main()
