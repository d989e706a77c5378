// sd-webui-spm: hover hints for the "Concept erasure (SPM)" accordion and the SPM tab.
// The WebUI shows `titles[label]` as the tooltip of any element whose text is that label
// (javascript/hints.js); extensions add their own entries the same way.
(function() {
    if (typeof titles === "undefined") {
        return; // not inside the WebUI (the standalone SPM server has no hints)
    }
    Object.assign(titles, {
        "Concept erasure (SPM)": "Erase concepts with SPMs. Each SPM acts on the images whose prompt mentions its concept; others are left (almost) untouched.",
        "Facilitated Transport: act only on prompts that mention the concept": "Gate each SPM per image by how close that image's prompt is to the SPM's concepts. Off: the SPM acts on every image.",
        "FT factor": "Scales how far a gate opens for a given similarity; 0 closes every gate. Higher values erase more on loosely related prompts.",
        "FT metric": "How prompt and concept are compared. pooled_tokenuni (default) is calibrated against unrelated prompts; clipcos_tokenuni is the published method.",
        "Refresh SPM list": "Read the SPM folder again",
    });
})();
