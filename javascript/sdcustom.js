// SD Customize: browser side of the Customize tab.
// The WebUI loads this file into every page (docs/host-formats.md#extension-loading); the standalone server runs it
// after the page loads. Everything is attached to `window`, so the same text works as a plain script and inside a
// function.
(function () {
    function sdcustomRoot() {
        if (typeof gradioApp === 'function') return gradioApp();
        var app = document.querySelector('gradio-app');
        return (app && app.shadowRoot) ? app.shadowRoot : document;
    }

    // Click the hidden poll button every second while the tab is on screen: the server answers with the
    // progress, the loss chart, the previews and, at the end, the result.
    function sdcustomTick() {
        if (document.visibilityState === 'hidden') return;
        var root = sdcustomRoot();
        var panel = root.querySelector('#sdcustom_panel');
        var button = root.querySelector('#sdcustom_poll');
        if (panel && button && panel.offsetParent !== null) button.click();
    }

    window.sdcustomInit = function () {
        if (!window.sdcustomTimer) window.sdcustomTimer = setInterval(sdcustomTick, 1000);
    };

    // Before the Train callback: give the WebUI a task id (its queue and progress API key on it).
    window.sdcustom_start_training = function () {
        var args = Array.prototype.slice.call(arguments);
        if (typeof randomId === 'function') args[0] = randomId();
        return args;
    };

    if (typeof onUiLoaded === 'function') onUiLoaded(window.sdcustomInit);
})();
