from alignsearch.surfaces.cli import main

main(prog_name="alignsearch")
