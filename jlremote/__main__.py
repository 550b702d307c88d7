from jlremote.cli import main

main()
