from src.chat.terminal import main

raise SystemExit(main())
