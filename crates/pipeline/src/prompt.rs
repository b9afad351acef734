//! AUTOMATIC1111 prompt syntax: emphasis, BREAK, and chunking into 77-token windows.
