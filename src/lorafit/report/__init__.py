"""Reading run folders back as reports: one run's report.html, and the comparison of several runs."""
