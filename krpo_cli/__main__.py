from krpo_cli.cli import app

app(prog_name="krpo")
