//! The end-to-end test binary: each module runs the real `fruits-flow` binary with the
//! real model on real Fruits-360 images (in-repo fixtures; ../shared when present).

mod util;

// The exported model: ImageNet classes and exactness against the numpy reference.
mod model;
// `run --once`, status, export (read back with pyarrow), incremental == batch.
mod pipeline;
// Same statistics at -w 1, -w 4 and 3 processes on loopback; a lost, stopped, missing or
// late process.
mod cluster;
// Exactly once across restarts; deletions retract.
mod recovery;
// Every kind of bad input is recorded, nothing else lost.
mod bad_input;
// The same over a real S3 server: tailing, outage, credentials, three processes.
mod s3;
// kill -9 at random points, restart: every image exactly once.
mod crash;
// classify and the HTTP endpoint, including malformed input and live model updates.
mod serve;
// The report's pictures and page.
mod report;
// The web page: map, thumbnails (only sampled keys), and the page in headless Chromium.
mod web;
