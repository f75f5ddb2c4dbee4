from modelkit.cli import run

run()
