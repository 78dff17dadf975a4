from src.benchmark.grid import main

raise SystemExit(main())
