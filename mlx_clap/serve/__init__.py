"""`mlx-clap serve`: a local web page to search, listen to, map and clean a sound library.

The pieces, one job each:

- `engine`: the store and the warm model behind the page (queries, results, timelines, duplicates);
- `media`: store rows to audio files inside the library folders the store records, opened without
  following links and served from that one descriptor (no client paths);
- `uploads`: a dropped query sound streamed, size-limited, into a temp folder that is deleted after use;
- `thumbs`: waveform peaks for the result thumbnails;
- `layout`: the 2-D map of the library (PCA + clusters), cached as `map.json` beside the store;
- `security`: allowed hosts, the session token, same-origin checks and the security headers;
- `app`: the Starlette application that routes requests to the above; `static/`: the page itself.

Starlette and uvicorn are the optional extra `serve`; nothing here is imported by `import mlx_clap`.
"""
