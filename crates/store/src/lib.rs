//! Model catalog, model store and the fetcher.
