from alignsearch.cli import main

main(prog_name="alignsearch")
