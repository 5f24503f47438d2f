//! The pure parts of ztunnel, as a library the binary and the fuzz targets
//! share (everything with sockets lives in the binary).

pub mod dns {
    pub mod answer;
}
