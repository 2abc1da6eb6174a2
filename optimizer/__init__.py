"""The layout optimizer: a Pyomo MILP solved by HiGHS. Never touches the database."""
