from labmeter.cli import main

main()
